# %% tags=["parameters"]
upstream = ["prepare"]
product = None
alpha = 0.5
folds = 5

# %%
import pandas as pd

df = pd.read_csv(upstream["prepare"]["data"])
score = float((df.y - alpha * df.x).abs().mean())
pd.DataFrame({"alpha": [alpha], "seed": [seed], "folds": [folds], "score": [score]}).to_csv(
    product["metrics"], index=False)
