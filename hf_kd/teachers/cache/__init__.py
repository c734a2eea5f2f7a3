"""Teacher caches: a teacher's outputs captured once into a self-describing ``datasets`` dataset,
checked against a run and read back instead of running the teacher.

- :mod:`hf_kd.teachers.cache.format`: the files, the teacher columns, the metadata and its hashes;
- :mod:`hf_kd.teachers.cache.capture`: running a teacher over the splits, shard by shard, resumable and
  split over the processes of a distributed group, as its :class:`~hf_kd.teachers.cache.spec.CaptureSpec`
  says; the batches of teacher outputs become rows in :mod:`~hf_kd.teachers.cache.rows`, written and merged
  in :mod:`~hf_kd.teachers.cache.shards`, the kept probability mass reported by
  :mod:`~hf_kd.teachers.cache.kept_mass`;
- :mod:`hf_kd.teachers.cache.load`: reading a cache (local or from the Hub), verifying every recorded
  fact, joining its columns to a run's rows.

Loading the data and the teacher for a capture is the orchestration layer's (:mod:`hf_kd.runs.capture`);
the dataset card is :mod:`hf_kd.cards.dataset`, the upload :func:`hf_kd.hub.push_cache_to_hub`.
"""
