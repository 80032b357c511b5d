"""``cryonb simulate``: particle stacks or micrographs with known truth."""

from __future__ import annotations

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    """Register the subcommand."""
    p = sub.add_parser(
        "simulate", help="simulate particles or micrographs with known truth",
        description="Project a map (default: the built-in phantom) into a RELION 3.1 particle "
                    "stack (particles.star + particles.mrcs + particles_truth.csv), or into "
                    "micrographs with particles at known coordinates (--micrographs).")
    p.add_argument("--o", required=True, help="output folder")
    p.add_argument("--map", default=None, help="map to project (.mrc); default: phantom")
    p.add_argument("--angpix", type=float, default=None,
                   help="pixel size of the map in A (default: from the header; 3.0 for the "
                        "phantom)")
    p.add_argument("--box", type=int, default=None, help="image box size (pixels)")
    p.add_argument("--n", type=int, default=1000, help="number of particles")
    p.add_argument("--views", type=int, default=8,
                   help="number of discrete views (0 = uniformly random orientations)")
    p.add_argument("--snr", type=float, default=0.1, help="pixel SNR after CTF")
    p.add_argument("--max_offset", type=float, default=3.0, help="offsets within this radius (px)")
    p.add_argument("--no_ctf", action="store_true", help="no CTF")
    p.add_argument("--defocus", type=float, nargs=2, default=(10000.0, 30000.0),
                   metavar=("MIN", "MAX"), help="defocus range (A)")
    p.add_argument("--particle_diameter", type=float, default=None, help="A")
    p.add_argument("--micrographs", type=int, default=0,
                   help="simulate this many micrographs instead of a particle stack")
    p.add_argument("--mic_size", type=int, default=1024, help="micrograph size (pixels)")
    p.add_argument("--per_micrograph", type=int, default=40, help="particles per micrograph")
    p.add_argument("--random_seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args) -> int:
    """Simulate and write the files; prints where they are."""
    from ..simulate import (
        load_or_phantom,
        simulate_micrographs,
        simulate_particles,
        write_micrograph_set,
        write_particle_set,
    )

    vol, apix = load_or_phantom(args.map, args.box, args.angpix, seed=args.random_seed)
    if args.micrographs:
        sim = simulate_micrographs(vol, n_micrographs=args.micrographs, size=args.mic_size,
                                   pixel_size=apix, particles_per_micrograph=args.per_micrograph,
                                   particle_diameter=args.particle_diameter, snr=args.snr,
                                   defocus_range=tuple(args.defocus), seed=args.random_seed,
                                   progress=True)
        star = write_micrograph_set(sim, args.o)
        print(f"wrote {len(sim.micrographs)} micrographs with {len(sim.coordinates)} particles: "
              f"{star}")
        return 0
    sim = simulate_particles(vol, n=args.n, pixel_size=apix, n_views=args.views or None,
                             max_offset_px=args.max_offset, snr=args.snr, ctf=not args.no_ctf,
                             defocus_range=tuple(args.defocus),
                             particle_diameter=args.particle_diameter, seed=args.random_seed,
                             progress=True)
    star = write_particle_set(sim, args.o)
    print(f"wrote {len(sim.images)} particles ({sim.images.shape[-1]} px, "
          f"{sim.pixel_size:.3f} A/px): {star}")
    return 0
