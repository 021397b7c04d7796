# %% tags=["parameters"]
upstream = None
product = None

# %%
import pandas as pd

pd.DataFrame({"x": range(10), "y": [v * 2 for v in range(10)]}).to_csv(product["data"], index=False)
