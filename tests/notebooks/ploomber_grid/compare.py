# %% tags=["parameters"]
upstream = ["fit-*"]
product = None

# %%
import pandas as pd

scores = pd.concat(pd.read_csv(products["metrics"]) for products in upstream["fit-*"].values())
scores.nsmallest(1, "score").to_csv(product["best"], index=False)
