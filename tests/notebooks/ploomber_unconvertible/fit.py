# %% tags=["parameters"]
upstream = ["create_table", "plto"]
product = None
sample = 1.0
alpha = 1
beta = 0

# %%
import pickle

name = "plot"
print(upstream[name])

# %%
with open(product["model"], "wb") as f:
    pickle.dump({"alpha": alpha, "sample": sample}, f)
print("report at", product["nb"])
