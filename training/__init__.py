"""The training loop, its validation and its display, separate from the script so that they can be imported and tested."""
