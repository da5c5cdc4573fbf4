"""ASGI entry point: HTTP goes to Django (the static files too, answered by WhiteNoise's middleware),
WebSockets to the Channels consumers in routing.py. Every server runs this: daphne (the demo, the tests),
gunicorn's uvicorn workers (`./run serve`, studyapp/serving.py)."""

import os
import warnings

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "studyapp.settings")
# WhiteNoise's static file responses iterate the file synchronously; under ASGI Django reads them in a
# thread and warns that it does. That is what a small static file should cost, not a fault to report.
warnings.filterwarnings("ignore", message="StreamingHttpResponse must consume synchronous iterators")
# Set up Django before importing consumers, which may import models.
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from studyapp.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)
