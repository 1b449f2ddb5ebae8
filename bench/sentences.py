"""Print, as JSON, real English sentences: the first paragraph of the public docstrings of stdlib modules.

Run by :func:`bench.zoo.stdlib_sentences` in a fresh interpreter (``python -I``), never imported: what a
module's members are depends on what the process imported before (a package gains an attribute for each
submodule anyone imports; torch replaces ``inspect.getfile``), and the bench's text data must not.
"""

import argparse
import asyncio
import collections
import csv
import datetime
import email
import functools
import http.client
import inspect
import itertools
import json
import logging
import os
import pathlib
import re
import shutil
import socket
import string
import subprocess
import tarfile
import textwrap
import threading
import typing
import unittest
import urllib.request
import warnings
import zipfile

MODULES = (json, os, collections, string, textwrap, pathlib, argparse, re, itertools, inspect, shutil,
           subprocess, threading, logging, datetime, functools, typing, email, http.client, urllib.request,
           unittest, csv, zipfile, tarfile, socket, asyncio)


def sentences() -> list[str]:
    found = set()
    for module in MODULES:
        with warnings.catch_warnings():  # reading members touches deprecated aliases such as typing.io
            warnings.simplefilter("ignore", DeprecationWarning)
            docs = [(name, inspect.getdoc(obj)) for name, obj in inspect.getmembers(module)]
        for name, doc in docs:
            if doc and not name.startswith("_"):
                first = doc.strip().split("\n\n")[0].replace("\n", " ")
                if 20 < len(first) < 400:
                    found.add(first)
    return sorted(found)


if __name__ == "__main__":
    print(json.dumps(sentences()))
