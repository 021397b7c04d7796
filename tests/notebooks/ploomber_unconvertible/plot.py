# %% tags=["parameters"]
upstream = ["fi" + "t"]
product = None

# %%
import pickle

with open(upstream["fit"]["model"], "rb") as f:
    model = pickle.load(f)

# %%
%%bash
echo {upstream}
