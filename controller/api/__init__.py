"""The controller's REST API (FastAPI): views, admin actions, agents' calls, /metrics.

`tokenfabric.controller.api.server.create_app(controller)` builds the app; errors.py and
schemas.py hold what both the API and controller/app.py need.
"""
