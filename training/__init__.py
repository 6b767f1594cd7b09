"""The training loop, separate from the script so that it can be imported and tested."""
