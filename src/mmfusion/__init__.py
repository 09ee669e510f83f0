"""mmfusion: multimodal (image + text) fusion classifiers, from versioned data to a served model."""

__version__ = "0.1.0"
