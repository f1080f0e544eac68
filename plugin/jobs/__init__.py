"""Jobs: from a complete study to results on disk.

* `plugin.jobs.completion`: a study is complete after a quiet period.
* `plugin.jobs.queue`: planning a study's jobs, claiming, leasing, finishing, retrying.
* `plugin.jobs.execute`: the runner threads that hand claimed jobs to an executor.
* `plugin.jobs.executor`: where a job runs (worker processes).
"""
