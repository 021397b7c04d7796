"""Feature engineering shared by the notebooks."""


def add_features(frame):
    frame = frame.copy()
    frame["temp_range"] = frame["temp_max"] - frame["temp_min"]
    frame["wet"] = frame["precipitation"] > 0
    return frame
