using System.Collections.Concurrent;

namespace LocalVllm.Engine.Structured;

/// <summary>
/// One grammar rule's body as a deterministic automaton over bytes, with rule references as extra edges: from a state,
/// a byte leads to at most one state; a reference edge (rule, target) means "match that rule, then continue at
/// target" (the matcher pushes target); an accepting state may return to the caller. Bytes are grouped into classes
/// that every edge treats alike, so the table is states x classes. Immutable once built; shared by every grammar whose
/// rule has the same <see cref="Rx.Key"/> (see <see cref="Compile"/>), which is what lets masks be cached per state
/// across requests and schemas.
/// </summary>
internal sealed class RuleDfa
{
    /// <summary>Above this many states a rule is refused: its automaton (and its masks) would not fit a sane budget.</summary>
    public const int MaxStates = 50_000;
    private const int MaxNfaStates = 1_000_000;
    private static readonly ConcurrentDictionary<string, RuleDfa> Cache = new();
    private static readonly (int Rule, int Target)[] NoRefs = [];
    /// <summary>Automata kept for sharing between grammars; past this the cache starts over.</summary>
    private const int MaxCached = 20_000;

    private RuleDfa(string key, byte[] classOf, int classCount, int[] next, bool[] accept, (int Rule, int Target)[][] refs)
    {
        Key = key;
        ClassOf = classOf;
        ClassCount = classCount;
        Next = next;
        Accept = accept;
        Refs = refs;
        StateCount = accept.Length;
        HasBytes = new bool[StateCount];
        Exits = new bool[StateCount];
        for (int s = 0; s < StateCount; s++) Exits[s] = accept[s] || refs[s].Length > 0;
        for (int s = 0; s < StateCount; s++)
            for (int c = 0; c < classCount; c++)
                if (next[s * classCount + c] >= 0) { HasBytes[s] = true; break; }
        Id = Interlocked.Increment(ref s_nextId);
    }

    private static int s_nextId;

    /// <summary>A process-wide number, for caches keyed by automaton.</summary>
    public int Id { get; }
    public string Key { get; }
    public int StateCount { get; }
    public byte[] ClassOf { get; }
    public int ClassCount { get; }
    /// <summary>[state * ClassCount + class]: the next state, or -1.</summary>
    public int[] Next { get; }
    public bool[] Accept { get; }
    public (int Rule, int Target)[][] Refs { get; }
    public bool[] HasBytes { get; }
    /// <summary>[state]: <see cref="HasExits"/>, precomputed for the vocabulary walk.</summary>
    public bool[] Exits { get; }

    private int[]? _charRun;

    /// <summary>
    /// [state]: how many characters of JSON string text (<see cref="Utf8Text"/>) can follow from here one after another
    /// with every such character leading to the same next state and no exit on the way, inside the character or after
    /// it (int.MaxValue when such a run loops: an unbounded string; n - k at position k of a string of at most n). A
    /// token of text no longer than that stays inside the rule whatever its characters, so the vocabulary walk takes
    /// such subtrees whole.
    /// </summary>
    public int[] CharRun => _charRun ??= ComputeCharRun();

    private int[] ComputeCharRun()
    {
        // reach[s * 8 + u]: the one state every way of finishing the current character leads to from state s in
        // decoder state u (-1: none, not the same for all of them, or an exit inside the character); -2 not yet known.
        var reach = new int[StateCount * Utf8Text.States];
        Array.Fill(reach, -2);
        int Reach(int s, int u)
        {
            ref int known = ref reach[s * Utf8Text.States + u];
            if (known != -2) return known;
            known = -1; // provisional: a cycle inside one character is impossible (at most four bytes)
            int target = -2;
            for (int b = 0; b < 256 && target != -1; b++)
            {
                int after = Utf8Text.Next(u, (byte)b);
                if (after < 0) continue;
                int m = Step(s, (byte)b);
                int t = m < 0 ? -1 : after == 0 ? m : Exits[m] ? -1 : Reach(m, after);
                target = target == -2 || target == t ? t : -1;
            }
            reach[s * Utf8Text.States + u] = target < 0 ? -1 : target;
            return target < 0 ? -1 : target;
        }
        var successor = new int[StateCount];
        for (int s = 0; s < StateCount; s++) successor[s] = Exits[s] ? -1 : Reach(s, 0);
        // Run lengths along successor chains: -1 ends a run (0), a chain that comes back to itself never ends.
        var run = new int[StateCount];
        var visiting = new int[StateCount]; // 0 new, 1 on the current chain, 2 done
        var chain = new List<int>();
        for (int start = 0; start < StateCount; start++)
        {
            if (visiting[start] == 2) continue;
            chain.Clear();
            int s = start;
            int tail;
            while (true)
            {
                if (successor[s] < 0) { visiting[s] = 2; run[s] = 0; tail = 0; break; }
                if (visiting[s] == 2) { tail = run[s]; break; }
                if (visiting[s] == 1) { tail = int.MaxValue; break; } // a loop of uniform steps
                visiting[s] = 1;
                chain.Add(s);
                s = successor[s];
            }
            for (int k = chain.Count - 1; k >= 0; k--)
            {
                tail = tail == int.MaxValue ? int.MaxValue : tail + 1;
                run[chain[k]] = tail;
                visiting[chain[k]] = 2;
            }
        }
        return run;
    }

    public int Step(int state, byte b) => Next[state * ClassCount + ClassOf[b]];

    /// <summary>Whether a match may leave this rule here: return to the caller or enter another rule.</summary>
    public bool HasExits(int state) => Exits[state];

    /// <summary>Whether this automaton has no rule references (a plain byte language).</summary>
    public bool IsPure => Refs.All(r => r.Length == 0);

    /// <summary>The automaton for <paramref name="rx"/>, built once per distinct expression in the process.</summary>
    public static RuleDfa Compile(Rx rx)
    {
        if (rx is DfaRx d) return d.Dfa;
        if (Cache.TryGetValue(rx.Key, out var hit)) return hit;
        var built = Build(rx);
        if (Cache.Count > MaxCached) Cache.Clear(); // bounded: grammars already compiled keep their automata
        return Cache.GetOrAdd(rx.Key, built);
    }

    private static RuleDfa Build(Rx rx)
    {
        // Refuse at once what would only fail after building a million states.
        if (Size(rx, new Dictionary<Rx, long>(ReferenceEqualityComparer.Instance)) > MaxNfaStates)
            throw new GrammarException($"the grammar is too large (more than {MaxNfaStates:N0} automaton states in one rule: a very long bounded repetition or length limit?)");
        var nfa = new Nfa();
        int start = nfa.NewState();
        int end = nfa.Add(rx, start);
        return Determinise(nfa, start, end, rx.Key);
    }

    /// <summary>An upper bound of the NFA states <paramref name="rx"/> needs (saturating).</summary>
    private static long Size(Rx rx, Dictionary<Rx, long> memo)
    {
        if (memo.TryGetValue(rx, out long known)) return known;
        long size = rx switch
        {
            BytesRx or RefRx => 1,
            SeqRx q => q.Items.Sum(i => Size(i, memo)),
            AltRx a => a.Items.Sum(i => Size(i, memo)) * 1 + 2L * a.Items.Length + 1,
            RepeatRx r => Math.Min(long.MaxValue / 4, (Size(r.Item, memo) + 1) * (r.Max < 0 ? r.Min + 1L : r.Max)) + 2,
            DfaRx d => d.Dfa.StateCount + 1,
            GraphRx g => g.Nodes + 1 + g.Edges.Sum(e => Size(e.Label, memo)),
            _ => 1,
        };
        size = Math.Min(size, long.MaxValue / 4);
        memo[rx] = size;
        return size;
    }

    private static RuleDfa Determinise(Nfa nfa, int start, int final, string key)
    {
        // Byte classes: the boundaries of every range on every edge.
        var cut = new bool[257];
        cut[0] = true;
        foreach (var list in nfa.ByteEdges)
            foreach (var (lo, hi, _) in list) { cut[lo] = true; cut[hi + 1] = true; }
        var classOf = new byte[256];
        var reps = new List<byte>();
        int cls = -1;
        for (int b = 0; b < 256; b++)
        {
            if (cut[b]) { cls++; reps.Add((byte)b); }
            classOf[b] = (byte)cls;
        }
        int classCount = cls + 1;
        if (classCount > 255) throw new InvalidOperationException("byte classes overflow");

        // A DFA state is the set of "important" NFA states reached (those with byte or reference edges, or the final
        // one): pass-through states change nothing, so leaving them out makes sets smaller and merges equal states.
        int n = nfa.Eps.Count;
        var important = new bool[n];
        for (int q = 0; q < n; q++) important[q] = nfa.ByteEdges[q].Count > 0 || nfa.RefEdges[q].Count > 0 || q == final;
        var mark = new int[n];
        int generation = 0;
        var stack = new Stack<int>();
        var found = new List<int>();
        int[] Closure(IEnumerable<int> seeds)
        {
            generation++;
            found.Clear();
            foreach (int q in seeds)
                if (mark[q] != generation) { mark[q] = generation; stack.Push(q); }
            while (stack.Count > 0)
            {
                int q = stack.Pop();
                if (important[q]) found.Add(q);
                foreach (int t in nfa.Eps[q])
                    if (mark[t] != generation) { mark[t] = generation; stack.Push(t); }
            }
            var arr = found.ToArray();
            Array.Sort(arr);
            return arr;
        }

        var ids = new Dictionary<int[], int>(IntArrayComparer.Instance);
        var sets = new List<int[]>();
        var next = new List<int>();
        var accept = new List<bool>();
        var refs = new List<(int, int)[]>();
        int Intern(int[] set)
        {
            if (ids.TryGetValue(set, out int id)) return id;
            if (sets.Count >= MaxStates)
                throw new GrammarException($"the grammar needs more than {MaxStates:N0} automaton states for one rule (a very long bounded repetition or length limit?)");
            id = sets.Count;
            ids[set] = id;
            sets.Add(set);
            return id;
        }
        Intern(Closure([start]));
        var buckets = new List<int>[classCount];
        for (int c = 0; c < classCount; c++) buckets[c] = [];
        var sameTargets = new Dictionary<int[], int>(IntArrayComparer.Instance);
        for (int s = 0; s < sets.Count; s++)
        {
            var set = sets[s];
            foreach (var b in buckets) b.Clear();
            foreach (int q in set)
                foreach (var (lo, hi, to) in nfa.ByteEdges[q])
                    for (int c = classOf[lo]; c <= classOf[hi]; c++) buckets[c].Add(to);
            sameTargets.Clear();
            for (int c = 0; c < classCount; c++)
            {
                if (buckets[c].Count == 0) { next.Add(-1); continue; }
                var targets = buckets[c].ToArray();
                Array.Sort(targets);
                if (!sameTargets.TryGetValue(targets, out int t)) sameTargets[targets] = t = Intern(Closure(targets));
                next.Add(t);
            }
            accept.Add(Array.BinarySearch(set, final) >= 0);
            Dictionary<int, List<int>>? byRule = null;
            foreach (int q in set)
                foreach (var (rule, to) in nfa.RefEdges[q])
                {
                    byRule ??= [];
                    if (!byRule.TryGetValue(rule, out var l)) byRule[rule] = l = [];
                    l.Add(to);
                }
            refs.Add(byRule is null ? NoRefs : byRule.OrderBy(kv => kv.Key).Select(kv => (kv.Key, Intern(Closure(kv.Value)))).ToArray());
        }
        return new RuleDfa(key, classOf, classCount, next.ToArray(), accept.ToArray(), refs.ToArray());
    }

    /// <summary>Strings in both <paramref name="a"/> and <paramref name="b"/> (both pure).</summary>
    public static RuleDfa Intersect(RuleDfa a, RuleDfa b) => Product(a, b, (x, y) => x && y, dropDeadB: true, "&");

    /// <summary>Strings in <paramref name="a"/> but not in <paramref name="b"/> (both pure).</summary>
    public static RuleDfa Difference(RuleDfa a, RuleDfa b) => Product(a, b, (x, y) => x && !y, dropDeadB: false, "-");

    private static RuleDfa Product(RuleDfa a, RuleDfa b, Func<bool, bool, bool> acc, bool dropDeadB, string op)
    {
        if (!a.IsPure || !b.IsPure) throw new InvalidOperationException("product of automata with rule references");
        string key = $"({a.Key}){op}({b.Key})";
        if (Cache.TryGetValue(key, out var hit)) return hit;
        // Classes: pairs of the operands' classes that occur.
        var pairClass = new Dictionary<(int, int), int>();
        var classOf = new byte[256];
        var reps = new List<byte>();
        for (int x = 0; x < 256; x++)
        {
            var p = (a.ClassOf[x], b.ClassOf[x]);
            if (!pairClass.TryGetValue(p, out int c)) { pairClass[p] = c = pairClass.Count; reps.Add((byte)x); }
            classOf[x] = (byte)c;
        }
        int classCount = pairClass.Count;
        var ids = new Dictionary<(int, int), int>();
        var pairs = new List<(int A, int B)>();
        var next = new List<int>();
        int Intern((int, int) p)
        {
            if (ids.TryGetValue(p, out int id)) return id;
            if (pairs.Count >= MaxStates) throw new GrammarException($"the grammar needs more than {MaxStates:N0} automaton states for one rule");
            ids[p] = id = pairs.Count;
            pairs.Add(p);
            return id;
        }
        Intern((0, 0));
        for (int s = 0; s < pairs.Count; s++)
        {
            var (sa, sb) = pairs[s];
            for (int c = 0; c < classCount; c++)
            {
                int ta = a.Step(sa, reps[c]);
                int tb = sb < 0 ? -1 : b.Step(sb, reps[c]);
                next.Add(ta < 0 || (tb < 0 && dropDeadB) ? -1 : Intern((ta, tb)));
            }
        }
        var accept = pairs.Select(p => acc(a.Accept[p.A], p.B >= 0 && b.Accept[p.B])).ToArray();
        var refs = pairs.Select(_ => NoRefs).ToArray();
        var built = new RuleDfa(key, classOf, classCount, next.ToArray(), accept, refs).Trimmed();
        return Cache.GetOrAdd(key, built);
    }

    /// <summary>The same language without states from which no accepting state is reachable.</summary>
    private RuleDfa Trimmed()
    {
        var live = new bool[StateCount];
        bool changed = true;
        for (int s = 0; s < StateCount; s++) live[s] = Accept[s];
        while (changed)
        {
            changed = false;
            for (int s = 0; s < StateCount; s++)
            {
                if (live[s]) continue;
                for (int c = 0; c < ClassCount; c++)
                {
                    int t = Next[s * ClassCount + c];
                    if (t >= 0 && live[t]) { live[s] = true; changed = true; break; }
                }
            }
        }
        var next = (int[])Next.Clone();
        for (int i = 0; i < next.Length; i++)
            if (next[i] >= 0 && !live[next[i]]) next[i] = -1;
        return new RuleDfa(Key, ClassOf, ClassCount, next, Accept, Refs);
    }

    /// <summary>A Thompson automaton with epsilon, byte-range and rule-reference edges.</summary>
    private sealed class Nfa
    {
        public readonly List<List<(byte Lo, byte Hi, int To)>> ByteEdges = [];
        public readonly List<List<int>> Eps = [];
        public readonly List<List<(int Rule, int To)>> RefEdges = [];

        public int NewState()
        {
            if (Eps.Count >= MaxNfaStates) throw new GrammarException($"the grammar is too large (more than {MaxNfaStates:N0} automaton states in one rule)");
            ByteEdges.Add([]);
            Eps.Add([]);
            RefEdges.Add([]);
            return Eps.Count - 1;
        }

        /// <summary>Adds <paramref name="rx"/> starting at <paramref name="from"/>; returns its end state.</summary>
        public int Add(Rx rx, int from)
        {
            switch (rx)
            {
                case BytesRx b:
                {
                    int end = NewState();
                    foreach (var (lo, hi) in b.Spans) ByteEdges[from].Add((lo, hi, end));
                    return end;
                }
                case SeqRx s:
                {
                    int cur = from;
                    foreach (var i in s.Items) cur = Add(i, cur);
                    return cur;
                }
                case AltRx a:
                {
                    int end = NewState();
                    foreach (var i in a.Items)
                    {
                        int st = NewState();
                        Eps[from].Add(st);
                        Eps[Add(i, st)].Add(end);
                    }
                    return end;
                }
                case RepeatRx r:
                {
                    int cur = from;
                    for (int k = 0; k < r.Min; k++) cur = Add(r.Item, cur);
                    if (r.Max < 0)
                    {
                        int loop = NewState();
                        Eps[cur].Add(loop);
                        Eps[Add(r.Item, loop)].Add(loop);
                        return loop;
                    }
                    int end = NewState();
                    Eps[cur].Add(end);
                    for (int k = r.Min; k < r.Max; k++)
                    {
                        cur = Add(r.Item, cur);
                        Eps[cur].Add(end);
                    }
                    return end;
                }
                case RefRx f:
                {
                    int end = NewState();
                    RefEdges[from].Add((f.Rule, end));
                    return end;
                }
                case DfaRx d:
                {
                    var dfa = d.Dfa;
                    var map = new int[dfa.StateCount];
                    for (int s = 0; s < map.Length; s++) map[s] = NewState();
                    int end = NewState();
                    Eps[from].Add(map[0]);
                    for (int s = 0; s < map.Length; s++)
                    {
                        int runStart = 0, runTarget = dfa.Step(s, 0);
                        for (int x = 1; x <= 256; x++)
                        {
                            int t = x < 256 ? dfa.Step(s, (byte)x) : int.MinValue;
                            if (t == runTarget) continue;
                            if (runTarget >= 0) ByteEdges[map[s]].Add(((byte)runStart, (byte)(x - 1), map[runTarget]));
                            runStart = x;
                            runTarget = t;
                        }
                        foreach (var (rule, t) in dfa.Refs[s]) RefEdges[map[s]].Add((rule, map[t]));
                        if (dfa.Accept[s]) Eps[map[s]].Add(end);
                    }
                    return end;
                }
                case GraphRx g:
                {
                    var map = new int[g.Nodes];
                    for (int n = 0; n < map.Length; n++) map[n] = NewState();
                    Eps[from].Add(map[0]);
                    foreach (var (f, label, t) in g.Edges)
                    {
                        if (label.IsNothing) continue;
                        Eps[Add(label, map[f])].Add(map[t]);
                    }
                    int end = NewState();
                    foreach (int n in g.Finals) Eps[map[n]].Add(end);
                    return end;
                }
                default:
                    throw new InvalidOperationException($"unknown expression {rx.GetType().Name}");
            }
        }
    }

    private sealed class IntArrayComparer : IEqualityComparer<int[]>
    {
        public static readonly IntArrayComparer Instance = new();
        public bool Equals(int[]? x, int[]? y) => x.AsSpan().SequenceEqual(y);
        public int GetHashCode(int[] a)
        {
            var h = new HashCode();
            foreach (int v in a) h.Add(v);
            return h.ToHashCode();
        }
    }
}

/// <summary>A constraint that cannot be compiled: an invalid or unsupported schema, regex or grammar.</summary>
public sealed class GrammarException(string message) : ArgumentException(message);
