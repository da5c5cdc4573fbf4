from django.contrib import admin

from studyapp.models import Arm, Comparison, Job, Participant, Study


class ArmInline(admin.TabularInline):
    model = Arm
    extra = 0


class ComparisonInline(admin.TabularInline):
    model = Comparison
    extra = 0


@admin.register(Study)
class StudyAdmin(admin.ModelAdmin):
    list_display = [
        "title",
        "slug",
        "domain",
        "is_open",
        "quota",
        "n_pairs",
        "n_eval_questions",
        "created_at",
    ]
    list_filter = ["is_open", "domain"]
    search_fields = ["title", "slug"]
    prepopulated_fields = {"slug": ["title"]}
    inlines = [ArmInline, ComparisonInline]


@admin.register(Participant)
class ParticipantAdmin(admin.ModelAdmin):
    """Read-only: participants change only through their own pages (and withdrawal)."""

    list_display = ["token", "study", "state", "generation", "picks_done", "ratings_done", "created_at"]
    list_filter = ["study", "state", "generation"]
    search_fields = ["token", "recruitment_study_id", "recruitment_session_id"]
    readonly_fields = [f.name for f in Participant._meta.fields]

    def has_add_permission(self, request: object) -> bool:
        return False

    def has_change_permission(self, request: object, obj: object = None) -> bool:
        return False


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    list_display = ["id", "kind", "status", "study", "stage", "created_at", "finished_at"]
    list_filter = ["kind", "status"]
    readonly_fields = ["id", "celery_task_id", "output_dir", "log", "created_at", "started_at", "finished_at"]
