"""Function tasks: dump returns an object for a serializer to write."""

import pandas as pd


def dump(upstream):
    return pd.DataFrame({"a": [1, 2]})
