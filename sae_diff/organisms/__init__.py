"""organisms"""
