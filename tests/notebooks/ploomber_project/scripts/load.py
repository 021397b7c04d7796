# %% [markdown]
# Load the daily weather, keeping the years from `min_year` on.

# %%
import pandas as pd

# %% tags=["parameters"]
upstream = None
product = None
min_year = 2012

# %%
df = pd.read_csv("data/weather.csv", parse_dates=["date"])
df = df[df.date.dt.year >= min_year]

# %%
df.to_csv(product["data"], index=False)
