"""Manifest schema, image/text I/O, cleaning, validation, splitting and augmentation."""
