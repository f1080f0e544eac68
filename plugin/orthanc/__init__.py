"""radgate inside Orthanc: an Orthanc Python plugin that hands stable studies to radgate.

Orthanc's Python plugin runs ``orthanc_config/radgate_plugin.py``, which puts this project and
its virtual environment on ``sys.path`` and calls `plugin.orthanc.entry.register`. The plugin is
only a receiver: it copies a stable study's instances into radgate's spool and job store through
the same code the DICOM receiver uses, declares the study revision complete and routes it, so
its jobs are queued in the store. No inference runs in Orthanc's process (torch is never
imported there): ``radgate worker`` processes on the same data dir and store run the jobs and
send the results back into the same Orthanc study through an ``orthanc`` destination.

* `plugin.orthanc.bridge`: the work, written against a small REST protocol (testable without
  the plugin): import a study, complete and route it, follow Orthanc's ``/changes`` log.
* `plugin.orthanc.entry`: the Orthanc side: callbacks, REST routes, the worker thread, the
  Orthanc Explorer button, logging into Orthanc's log.
"""
