"""Imported only as the verification pool's fork-server preload: builds math-verify's parser caches once in the
fork server, so every worker forked from it starts warm (see `distill.filter.answers.warm_up`)."""

from distill.filter.answers import warm_up

warm_up()
