"""Inference on whole volumes, shared by use_model.py, batch_process_patients.py and test.py."""
