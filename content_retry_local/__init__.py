"""The local runtime: what stands in for AWS and RDS on one machine.

Imported only by the command line and the tests, never by the Lambda handlers.
"""
