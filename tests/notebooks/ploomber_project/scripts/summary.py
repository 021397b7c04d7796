# %%
import json

import pandas as pd

# %% tags=["parameters"]
upstream = ["monthly", "wettest"]
product = None
title = "weather"

# %%
monthly = pd.read_csv(upstream["monthly"]["table"])
wettest = pd.read_csv(upstream['wettest'])

# %%
summary = {
    "title": title,
    "months": len(monthly),
    "total_mm": round(float(monthly.precipitation.sum()), 1),
    "wettest_day": wettest.date.iloc[0],
}
with open(product["report"], "w") as f:
    json.dump(summary, f)
print(f"wrote {product['report']}")
