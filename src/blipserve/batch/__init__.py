"""Batch jobs: the same engine over folders, tables and lists, resumable, locally or on Ray.

``blipserve.batch.runner`` (the job), ``sources`` (inputs), ``sinks`` (outputs),
``journal`` (resume), ``ray`` (Ray Data). Import what you need from those modules; this
package imports nothing heavy itself, so the CLI stays quick to start.
"""
