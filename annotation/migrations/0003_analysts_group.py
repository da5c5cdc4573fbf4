"""The `analysts` group (studyapp.coordinators.ANALYSTS_GROUP): its members see dashboards and job results
and export data, but change nothing. An administrator adds accounts to it in the admin."""

from django.db import migrations

ANALYSTS_GROUP = "analysts"  # a migration keeps its own copy: it must not change when the code does


def create_group(apps, schema_editor):
    apps.get_model("auth", "Group").objects.get_or_create(name=ANALYSTS_GROUP)


class Migration(migrations.Migration):
    dependencies = [
        ("annotation", "0002_survey_age_range_labels"),
        ("auth", "0012_alter_user_first_name_max_length"),
    ]

    operations = [migrations.RunPython(create_group, migrations.RunPython.noop)]
