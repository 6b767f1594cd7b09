"""The bottom layer, importing no other package of the project: errors, registries, run folder, device, pictures."""
