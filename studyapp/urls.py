from django.contrib import admin
from django.urls import path

from studyapp import participant_views as p
from studyapp import views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("healthz", views.healthz, name="healthz"),
    # The participant's journey (studyapp.flow names these routes).
    path("s/<slug:slug>/", p.entry, name="participant-entry"),
    path("s/<slug:slug>/consent/", p.consent, name="participant-consent"),
    path("s/<slug:slug>/instructions/", p.instructions, name="participant-instructions"),
    path("s/<slug:slug>/pick/<int:number>/", p.pick, name="participant-pick"),
    path("s/<slug:slug>/waiting/", p.waiting, name="participant-waiting"),
    path("s/<slug:slug>/status/", p.status, name="participant-status"),
    path("s/<slug:slug>/rate/<int:number>/", p.rate, name="participant-rate"),
    path("s/<slug:slug>/survey/", p.survey, name="participant-survey"),
    path("s/<slug:slug>/done/", p.done, name="participant-done"),
    path("s/<slug:slug>/withdraw/", p.withdraw, name="participant-withdraw"),
]
