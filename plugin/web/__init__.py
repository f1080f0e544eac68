"""The web console, REST API and /metrics, served by the node itself (no single-page-app build).

* `plugin.web.app`: `create_app` (FastAPI) and `WebServer` (uvicorn in a thread).
* `plugin.web.security`: roles, the logged-in `Principal`, the `require` dependency (login, role, CSRF).
* `plugin.web.users`: users, passwords (argon2), login sessions and API tokens in the job store.
* `plugin.web.audit`: the audit trail (`record`), a study's life read from the store, ATNA syslog.
* `plugin.web.routes`: login, logout, the account and audit pages, /healthz, the OpenAPI document.
* `plugin.web.api`, `plugin.web.pages`, `plugin.web.metrics`: the console's JSON API, its pages, /metrics.
"""
