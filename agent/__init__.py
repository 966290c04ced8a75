"""knowledger.agent"""
