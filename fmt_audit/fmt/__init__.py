"""Feature map testing: disturb every Conv channel, score it, select the outliers; ``scan``."""
