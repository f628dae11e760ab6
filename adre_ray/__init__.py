"""adre-ray: training and certification of randomized-smoothed classifiers."""
__version__ = "0.1.0"
