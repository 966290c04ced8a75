"""knowledger.cli"""
