from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import path

from studyapp import analysis_views as analyses
from studyapp import export_views as exports
from studyapp import participant_views as p
from studyapp import studio_views as studio
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
    # The coordinators' studio.
    path(
        "studio/login/",
        auth_views.LoginView.as_view(template_name="studio/login.html", redirect_authenticated_user=True),
        name="studio-login",
    ),
    path("studio/logout/", auth_views.LogoutView.as_view(), name="studio-logout"),
    path("studio/", studio.home, name="studio-home"),
    path("studio/studies/new/", studio.new_study, name="studio-study-new"),
    path("studio/imports/llmfao/", studio.import_llmfao, name="studio-import-llmfao"),
    path("studio/studies/<slug:slug>/", studio.dashboard, name="studio-study"),
    path("studio/studies/<slug:slug>/edit/", studio.edit_study, name="studio-study-edit"),
    path(
        "studio/studies/<slug:slug>/dashboard.json", studio.dashboard_json, name="studio-study-dashboard-json"
    ),
    path(
        "studio/studies/<slug:slug>/participants/<slug:token>/return/",
        studio.participant_return,
        name="studio-participant-return",
    ),
    path(
        "studio/studies/<slug:slug>/participants/<slug:token>/retry-generation/",
        studio.participant_retry_generation,
        name="studio-participant-retry-generation",
    ),
    path("studio/studies/<slug:slug>/export/", exports.export_page, name="studio-study-export"),
    path("studio/studies/<slug:slug>/analysis/", analyses.analysis_page, name="studio-study-analysis"),
    path(
        "studio/studies/<slug:slug>/analysis/report.zip",
        analyses.analysis_download,
        name="studio-study-analysis-download",
    ),
    path(
        "studio/studies/<slug:slug>/analysis/crowd-report/",
        analyses.crowd_report_compute,
        name="studio-study-crowd-report",
    ),
    path("studio/jobs/new/<slug:kind>/", studio.new_job, name="studio-job-new"),
    path("studio/jobs/<uuid:job_id>/", studio.job_page, name="studio-job"),
    path("studio/jobs/<uuid:job_id>/status.json", studio.job_status_json, name="studio-job-status"),
    path("studio/jobs/<uuid:job_id>/files/<str:name>", studio.job_file, name="studio-job-file"),
    # The export API for scripts (a session or a bearer token; docs/analyst-guide.md).
    path("api/studies/<slug:slug>/export/", exports.export_index, name="api-study-export"),
    path(
        "api/studies/<slug:slug>/export/<slug:table>.<slug:fmt>",
        exports.export_table,
        name="api-study-export-table",
    ),
]

# A database lost outside a view (e.g. as the session is saved) answers the 503 page too.
handler500 = "studyapp.middleware.server_error"
