from django.contrib import admin

from annotation.models import (
    CandidatePair,
    ElicitationItem,
    ElicitationPick,
    GeneratedResponse,
    Question,
    Rating,
    RatingItem,
    SurveyResponse,
)


class CandidatePairInline(admin.StackedInline):
    model = CandidatePair
    extra = 0


@admin.register(Question)
class QuestionAdmin(admin.ModelAdmin):
    list_display = ["__str__", "study", "use", "topic"]
    list_filter = ["study", "use"]
    search_fields = ["text", "source_id"]
    inlines = [CandidatePairInline]


class ReadOnlyAdmin(admin.ModelAdmin):
    """Participants' data: coordinators read it; only the participant's own pages write it."""

    def has_add_permission(self, request: object) -> bool:
        return False

    def has_change_permission(self, request: object, obj: object = None) -> bool:
        return False


@admin.register(ElicitationItem)
class ElicitationItemAdmin(ReadOnlyAdmin):
    list_display = ["participant", "position", "pair", "a_on_left", "shown_at"]
    list_filter = ["participant__study"]


@admin.register(ElicitationPick)
class ElicitationPickAdmin(ReadOnlyAdmin):
    list_display = ["item", "choice", "answered_at", "elapsed_ms"]
    list_filter = ["item__participant__study"]


@admin.register(GeneratedResponse)
class GeneratedResponseAdmin(ReadOnlyAdmin):
    list_display = ["participant", "arm", "question", "new_tokens", "finish_reason", "created_at"]
    list_filter = ["participant__study", "arm"]


@admin.register(RatingItem)
class RatingItemAdmin(ReadOnlyAdmin):
    list_display = ["participant", "position", "question", "is_repeat", "is_attention_check", "shown_at"]
    list_filter = ["participant__study", "is_repeat", "is_attention_check"]


@admin.register(Rating)
class RatingAdmin(ReadOnlyAdmin):
    list_display = ["item", "choice", "strength", "answered_at", "elapsed_ms"]
    list_filter = ["item__participant__study"]


@admin.register(SurveyResponse)
class SurveyResponseAdmin(ReadOnlyAdmin):
    list_display = ["participant", "age_range", "education", "submitted_at"]
    list_filter = ["participant__study"]
