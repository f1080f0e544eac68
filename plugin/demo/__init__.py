"""``radgate demo``: a whole node against a local Orthanc, on a synthetic study (`plugin.demo.local`)."""
