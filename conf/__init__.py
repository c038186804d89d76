"""Hydra configs, shipped inside the fcexp package as fcexp.conf so installed copies find them too."""
