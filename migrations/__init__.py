"""knowledger.migrations"""
