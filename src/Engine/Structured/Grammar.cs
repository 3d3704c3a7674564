namespace LocalVllm.Engine.Structured;

/// <summary>
/// A context-free grammar over bytes while it is being built: rules whose bodies are <see cref="Rx"/> expressions
/// that may reference other rules (recursion included). Rule 0 is the start. <see cref="Compile"/> turns every body
/// into its automaton.
/// </summary>
internal sealed class Grammar
{
    private readonly List<Rx?> _bodies = [];
    private readonly List<string> _names = [];

    /// <summary>Reserves a rule (its body set later, so rules can refer to each other); returns its number.</summary>
    public int Declare(string name)
    {
        _bodies.Add(null);
        _names.Add(name);
        return _bodies.Count - 1;
    }

    public void Define(int rule, Rx body) => _bodies[rule] = body;

    public int Add(string name, Rx body)
    {
        int r = Declare(name);
        Define(r, body);
        return r;
    }

    public int Count => _bodies.Count;

    /// <summary>The start rule (0 unless changed).</summary>
    public int Start { get; set; }

    public CompiledGrammar Compile(string description)
    {
        var dfas = new RuleDfa[_bodies.Count];
        for (int i = 0; i < dfas.Length; i++)
            dfas[i] = RuleDfa.Compile(_bodies[i] ?? throw new InvalidOperationException($"rule '{_names[i]}' has no body"));
        // A rule is productive when some path through it reaches acceptance using only productive rules.
        var productive = new bool[dfas.Length];
        bool changed = true;
        while (changed)
        {
            changed = false;
            for (int r = 0; r < dfas.Length; r++)
                if (!productive[r] && Reaches(dfas[r], productive)) { productive[r] = true; changed = true; }
        }
        if (!productive[Start]) throw new GrammarException($"{description} is unsatisfiable: no output can match it");
        return new CompiledGrammar(dfas, productive, Start, description);
    }

    private static bool Reaches(RuleDfa dfa, bool[] productive)
    {
        var seen = new bool[dfa.StateCount];
        var stack = new Stack<int>([0]);
        seen[0] = true;
        while (stack.Count > 0)
        {
            int s = stack.Pop();
            if (dfa.Accept[s]) return true;
            for (int c = 0; c < dfa.ClassCount; c++)
            {
                int t = dfa.Next[s * dfa.ClassCount + c];
                if (t >= 0 && !seen[t]) { seen[t] = true; stack.Push(t); }
            }
            foreach (var (rule, t) in dfa.Refs[s])
                if (productive[rule] && !seen[t]) { seen[t] = true; stack.Push(t); }
        }
        return false;
    }
}

/// <summary>
/// A compiled constraint: one automaton per rule. Immutable and shared by every request with the same constraint;
/// each sequence walks it with its own <see cref="GrammarMatcher"/>.
/// </summary>
public sealed class CompiledGrammar
{
    internal CompiledGrammar(RuleDfa[] rules, bool[] productive, int start, string description)
    {
        Start = start;
        Rules = rules;
        Productive = productive;
        Description = description;
    }

    internal RuleDfa[] Rules { get; }
    internal int Start { get; }
    internal bool[] Productive { get; }

    /// <summary>What the grammar was made from, for messages.</summary>
    public string Description { get; }

    /// <summary>Automaton states over all rules (a size measure).</summary>
    public int StateCount => Rules.Sum(r => r.StateCount);
}
