"""The project's ASGI application as a single-machine server runs it (the demo site, the browser tests):
unchanged, plus the static files, which a deployment serves from STATIC_ROOT after collectstatic (and
which `manage.py runserver` wraps in the same way)."""

from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

from studyapp.asgi import application as project_application

# Only HTTP requests under STATIC_URL are answered here; everything else (pages, sockets) goes to the app.
application = ASGIStaticFilesHandler(project_application)
