"""Adapter file formats: ``peftkit`` (own), ``hf_peft`` (Hugging Face PEFT), and the codec that maps a method to peft."""
