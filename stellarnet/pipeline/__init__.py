"""The whole study in one command: ``python -m stellarnet.pipeline +experiment=apogee``.

The stages, in order (``pipeline.stages``), are listed in :mod:`.stages`: survey, cuts, shards, features,
train, baselines, evaluate, predict, crossval, export.

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
