"""knowledger.migrations.versions"""
