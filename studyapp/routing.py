from django.urls import path

from studyapp.consumers import JobProgressConsumer, ParticipantConsumer, StudyDashboardConsumer

websocket_urlpatterns = [
    # A slug keeps the id within what a channel-layer group name may hold.
    path("ws/jobs/<slug:job_id>/", JobProgressConsumer.as_asgi()),
    path("ws/studies/<slug:slug>/dashboard/", StudyDashboardConsumer.as_asgi()),
    path("ws/participants/<slug:token>/", ParticipantConsumer.as_asgi()),
]
