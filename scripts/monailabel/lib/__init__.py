"""IRIS MONAI Label app: in-context inference from the datastore's labels, and fine-tuning with them."""
