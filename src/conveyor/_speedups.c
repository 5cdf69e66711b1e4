/* conveyor's optional C accelerator.
 *
 * One function, take(q, n): pop the first n items of the deque q (at most
 * len(q)) into a new list. Channel.get_many() uses it when the channel holds
 * more than the batch asked for. In pure Python that is a C-level loop of
 * popleft() calls through itertools.starmap, which builds an argument tuple
 * per call; here each call is a vectorcall with no arguments, about half the
 * cost, and get_many() of 64 from a full channel spends most of its time there.
 *
 * The caller holds the channel's lock, so nobody else touches q meanwhile; on
 * a free-threaded build popleft() takes the deque's own lock as well. If a
 * pop fails anyway (out of memory), the items already taken are put back in
 * front, in order: nothing is lost.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* Put items[0:count] back in front of q, in their order (best effort). */
static void
put_back(PyObject *q, PyObject *items, Py_ssize_t count)
{
    for (Py_ssize_t i = count - 1; i >= 0; i--) {
        PyObject *res = PyObject_CallMethod(q, "appendleft", "O", PyList_GET_ITEM(items, i));
        Py_XDECREF(res);
    }
}

static PyObject *
take(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "take() takes 2 positional arguments (q, n), got %zd", nargs);
        return NULL;
    }
    PyObject *q = args[0];
    Py_ssize_t n = PyLong_AsSsize_t(args[1]);
    if (n == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t size = PyObject_Length(q);
    if (size < 0) {
        return NULL;
    }
    if (n > size) {
        n = size;
    }
    if (n < 0) {
        n = 0;
    }
    PyObject *popleft = PyObject_GetAttrString(q, "popleft");
    if (popleft == NULL) {
        return NULL;
    }
    PyObject *out = PyList_New(n);
    if (out == NULL) {
        Py_DECREF(popleft);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyObject_CallNoArgs(popleft);
        if (item == NULL) {
            PyObject *type, *value, *traceback;
            PyErr_Fetch(&type, &value, &traceback);
            put_back(q, out, i);
            PyErr_Restore(type, value, traceback);
            /* The list owns the items taken so far (put back in q too). */
            Py_DECREF(out);
            Py_DECREF(popleft);
            return NULL;
        }
        PyList_SET_ITEM(out, i, item);
    }
    Py_DECREF(popleft);
    return out;
}

static PyMethodDef speedups_methods[] = {
    {"take", (PyCFunction)(void (*)(void))take, METH_FASTCALL,
     "take(q, n, /)\n--\n\nPop the first n items of deque q (at most len(q)) into a list."},
    {NULL, NULL, 0, NULL},
};

static PyModuleDef_Slot speedups_slots[] = {
#ifdef Py_mod_multiple_interpreters
    /* Safe in every interpreter, each with a GIL of its own (PEP 684): no
     * static or global Python objects, no module state, no static types; the
     * objects take() touches belong to the interpreter that calls it.
     * Subinterpreter workers (runtime="interpreter") import it. */
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
#ifdef Py_GIL_DISABLED
    /* take() keeps no state of its own: safe without the GIL. */
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    "conveyor._speedups",
    "conveyor's optional C accelerator (see conveyor.channel).",
    0,
    speedups_methods,
    speedups_slots,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModuleDef_Init(&speedups_module);
}
