"""The project's ASGI application as the browser tests serve it: unchanged, plus the static files (which a
deployment serves from STATIC_ROOT after collectstatic, and `manage.py runserver` wraps in the same way)."""

from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

from studyapp.asgi import application as project_application

# Only HTTP requests under STATIC_URL are answered here; everything else (pages, sockets) goes to the app.
application = ASGIStaticFilesHandler(project_application)
