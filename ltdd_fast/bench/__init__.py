"""The benchmarks behind `ltdd bench`: each checks the fast path against its reference before it measures anything.

    operators  `ltdd bench ops`: every operator and size, reference and fast side by side, the ratio
    e2e        `ltdd bench e2e` and `ltdd bench memory`: whole iterations of a preset, speed and peak memory
    accuracy   `ltdd bench accuracy`: what a speed or memory option costs in distilled accuracy
    fidelity   `ltdd bench fidelity`: this method against plain matching, random real images and the whole set
    timing     the clock they share

May import anything below the CLI; only the CLI imports it. Results are kept in the repository's bench/results/.
"""
