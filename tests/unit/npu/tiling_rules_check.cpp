// Driver for test_tiling.py::test_cpp_rules_match_python: runs ops/ascendc/common/tiling_rules.h and
// ops/ascendc/moe_gemm/op_host/moe_gemm_mx_rules.h on the cases read from stdin and prints one line of fields per
// case (compiled with the host g++, no CANN).
//   in : "S <soc> <T> <H> <D> <K> <cores> <kv_fp8 0|1>"  or  "M <soc> <M> <N> <K> <E> <fmt 0|1|2> <cores> <allow_mx 0|1>"
//   out: "S ok hTile kvBlock dQk dPv nHBlk nKvBlk kvSplits blocksPerSplit units usedCores ws key ub l1 l0a l0b l0c
//         wsKv wsS wsP wsO wsPerCore wsPartO wsPartStats"
//        "M ok mx mTile nTile kTile kStep nNTile maxUnits ws key ub l1 l0a l0b l0c wsXq wsXs wsSlab wsSlabPerCore"
#include <iostream>
#include <string>

#include "moe_gemm_mx_rules.h"
#include "tiling_rules.h"

using namespace ascend_v4::tiling;

static SocCaps Caps(const std::string &soc)
{
    if (soc == "ascend910_93") return SOC_910_93;
    if (soc == "ascend950") return SOC_950;
    return SOC_910B;
}

static void PrintUsage(const Usage &u) { std::cout << ' ' << u.ub << ' ' << u.l1 << ' ' << u.l0a << ' ' << u.l0b << ' ' << u.l0c; }

int main()
{
    std::string kind, soc;
    while (std::cin >> kind >> soc) {
        if (kind == "S") {
            int64_t T, H, D, K, cores, fp8;
            std::cin >> T >> H >> D >> K >> cores >> fp8;
            SparseAttnTiling t = ComputeSparseAttnTiling(Caps(soc), T, H, D, K, cores, fp8 != 0);
            std::cout << "S " << t.ok << ' ' << t.hTile << ' ' << t.kvBlock << ' ' << t.dQk << ' ' << t.dPv << ' '
                      << t.nHBlk << ' ' << t.nKvBlk << ' ' << t.kvSplits << ' ' << t.blocksPerSplit << ' ' << t.units
                      << ' ' << t.usedCores << ' ' << t.workspaceBytes << ' ' << t.tilingKey;
            PrintUsage(t.usage);
            std::cout << ' ' << t.ws.kv << ' ' << t.ws.s << ' ' << t.ws.p << ' ' << t.ws.o << ' ' << t.ws.perCore << ' '
                      << t.ws.partO << ' ' << t.ws.partStats;
        } else {
            int64_t M, N, K, E, fmt, cores, mx;
            std::cin >> M >> N >> K >> E >> fmt >> cores >> mx;
            // the op_host path: MX where it applies and is allowed (moe_gemm_mx_rules.h), else the dequant path
            MoeGemmMxTiling r =
                ComputeMoeGemmTilingFor(Caps(soc), M, N, K, E, static_cast<WeightFmt>(fmt), cores, mx != 0);
            const MoeGemmTiling &t = r.t;
            std::cout << "M " << t.ok << ' ' << t.nativeMx << ' ' << t.mTile << ' ' << t.nTile << ' ' << t.kTile << ' '
                      << t.kStep << ' ' << t.nNTile << ' ' << t.maxUnits << ' ' << t.workspaceBytes << ' '
                      << t.tilingKey;
            PrintUsage(t.usage);
            std::cout << ' ' << r.ws.xq << ' ' << r.ws.xs << ' ' << r.ws.slab << ' ' << r.ws.slabPerCore;
        }
        std::cout << '\n';
    }
    return 0;
}
