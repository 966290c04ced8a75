"""knowledger.editors"""
