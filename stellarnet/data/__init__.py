"""Readers, quality cuts, spectra preprocessing, shards and the DataModule."""
