"""The whole study in one command: ``python -m stellarnet.pipeline +experiment=apogee``.

Stages, in order (``pipeline.stages``)::

    survey     simulate the survey (no allStar configured) or ingest the configured allStar
    cuts       quality cuts on the allStar → cut report + selected stars
    shards     HDF5 shard dataset (train/val/test split)           [in paths.data_dir]
    features   engineered feature table (parquet)                  [in paths.data_dir]
    train      the network (train(cfg)) → best checkpoint + model folder
    baselines  tree baselines per feature set (baselines(cfg)), feature-set comparison, importances
    evaluate   network on the test split (evaluate(cfg)) + gradient saliency vs wavelength
    predict    network predictions for every star of the shard dataset (predict(cfg))
    crossval   cross-survey offsets and calibrations (run_crossval) per external survey
    export     results catalogue (FITS/CSV/parquet) with calibrated labels and flags

Each stage records ``<pipeline_dir>/<stage>/stage.json`` (config hash, status, outputs, key
numbers, seconds). A stage's hash covers its own config slice and the hashes of the stages it
depends on, so a stage is skipped when that hash is unchanged and its outputs exist; changing a
value re-runs the stages that depend on it (directly or through other stages) and nothing else.
``pipeline.force=[train]`` (or ``[all]``) re-runs stages regardless. One progress line is
printed per stage, then a summary table (also ``<pipeline_dir>/summary.md`` / ``summary.json``).

Modules: :mod:`.run` (:func:`~stellarnet.pipeline.run.run_pipeline`: ``cfg`` → summary rows), :mod:`.stages`
(:data:`~stellarnet.pipeline.stages.STAGES`, one adapter per stage), :mod:`.cache` (records and
:func:`~stellarnet.pipeline.cache.stage_hash`).
"""
