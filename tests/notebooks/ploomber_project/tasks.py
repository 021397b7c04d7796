"""Function tasks of the Ploomber fixture: Ploomber calls each with its `product` and `upstream`."""

import pandas as pd


def wettest(product, upstream):
    df = pd.read_csv(upstream["load"]["data"])
    df.nlargest(3, "precipitation").to_csv(str(product), index=False)
