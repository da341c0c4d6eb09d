"""gptq"""
