"""The batch endpoint: batch jobs the server hosts, the way the catalog's batch endpoints
take them (``POST /jobs``).

:mod:`.uris` turns the URIs clients send into stores and applies the operator's allowed
roots; :mod:`.submit` checks a job before it is queued; :mod:`.table` keeps the job table
(records and leases) in the jobs folder; :mod:`.host` runs the jobs; :mod:`.behind` is the
server's engine as a job uses it, behind the requests.
"""
